"""Benchmarks on the bundled toy world: judged merge quality (``quality``), every benchmark row
(``variants``), the judged priors experiment (``judged_priors``) and charts (``plots``)."""
