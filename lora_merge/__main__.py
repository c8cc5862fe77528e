"""``python -m lora_merge ...`` is ``lora-merge ...`` (used by ``bench quality --jobs`` for its workers)."""
from .cli import main

if __name__ == "__main__":
    main()
