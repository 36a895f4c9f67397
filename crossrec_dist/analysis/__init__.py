"""Analysis of finished runs that benchmark studies rest on (benchmarks/README.md, benchmarks/RESULTS.md).

- :mod:`.paired`: two groups of finished fine-tuning runs compared on the same test users;
- :mod:`.delta_rank`: how low-rank the change full fine-tuning made is (SVD of ``W_full - W_base``);
- :mod:`.probes`: the names of transfer-probe runs (method variants, seeds) and their scratch references.

The benchmark scripts (``python -m benchmarks.paired_runs``, ``benchmarks.delta_rank``,
``benchmarks.transfer_probes``) are the command lines around these functions.
"""
