"""Transfer safeguards: forgetting and drift probes, gradual unfreezing, regularisers (``guards``); negative transfer, the from-scratch twin and verdicts (``transfer``, torch-free)."""
