"""make demo: the subseg story on the embedded synthetic cohorts (see conf/demo.yaml)."""

from subseg.tasks.commands import demo

if __name__ == "__main__":
    demo()
