"""dd-bench: every compiled variant of a student beside the PyTorch teacher, on this machine.

    dd-bench out/                         # bench JSON + Markdown + plots in out/bench/
    dd-bench merge a.json b.json -o targets.md

Modules: fingerprint (the machine), flops (FLOPs per call, matmul peak), variants (what is
measured), measure (timing and memory), schema (the bench JSON), merge, plots, cli.
"""
