"""python finetune.py …: see conf/finetune.yaml."""

from subseg.tasks.commands import finetune

if __name__ == "__main__":
    finetune()
