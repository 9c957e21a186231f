"""python train.py dataset=<cohort>: train a network from scratch (see conf/train.yaml)."""

from subseg.tasks.commands import train

if __name__ == "__main__":
    train()
