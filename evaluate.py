"""python evaluate.py …: see conf/evaluate.yaml."""

from subseg.tasks.commands import evaluate

if __name__ == "__main__":
    evaluate()
