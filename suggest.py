"""python suggest.py source_run=<run> input=<folder of scans> n=<k>: which scans to label first."""

from subseg.tasks.commands import suggest

if __name__ == "__main__":
    suggest()
