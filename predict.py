"""python predict.py run_dir=<run> input=<file|folder>: segment new T1 scans."""

from subseg.tasks.commands import predict

if __name__ == "__main__":
    predict()
