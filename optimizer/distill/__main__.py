"""`python -m optimizer.distill ...` and `torchrun --nproc_per_node N -m optimizer.distill ...`."""

from optimizer.distill.cli import main

if __name__ == "__main__":
    main()
