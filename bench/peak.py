"""The machine's physical limits: fp32 / bf16 matmul GFLOP/s and memory copy bandwidth.

    python bench/peak.py

Every other benchmark states its figures as a fraction of these. The last line is what
`train.precision: auto` chooses on this CPU, from its own short probe (cached per CPU).
"""

import torch
from _common import measure_peak, print_table

from lmforge.device import choose_precision

if __name__ == "__main__":
    peak = measure_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_table(
        ["measure", "value"],
        [
            ["fp32 matmul", f"{peak['fp32_gflops']:.0f} GFLOP/s"],
            ["bf16 matmul", f"{peak['bf16_gflops']:.0f} GFLOP/s"],
            ["memory copy", f"{peak['copy_gbytes_per_second']:.1f} GB/s"],
        ],
    )
    print(f"train.precision auto on this CPU: {choose_precision(torch.device('cpu'), 'auto')}")
