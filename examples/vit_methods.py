"""Every fine-tuning method on a tiny ViT and real digits (scikit-learn's bundled 8×8 images).

Same as ``python -m fastpeft demo``; pass ``--quick`` for a smoke run.
"""
import sys

from fastpeft import demo

if __name__ == "__main__":
    sys.exit(demo.main(sys.argv[1:]))
