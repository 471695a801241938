"""Speed: features applied to a prepared model and the throughput meter (``speed``), fast frozen linears (``fastlinear``)."""
