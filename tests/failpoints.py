"""Test failpoints for ``tsgb explain``: a :class:`tsgb_ext.io.StoreHooks` that stops a run
at a named step, and a runner for subprocesses (a SIGKILL must hit another process):

    python -m failpoints "rows@2=kill" explain INPUT --out DIR ...

SPEC is ``STEP[@N]=ACTION[;...]``: ACTION ``kill`` (SIGKILL), ``exit`` (``os._exit(99)``),
``interrupt`` (raise KeyboardInterrupt), ``sigint`` (send SIGINT to itself) or ``wait:PATH``
(create ``PATH.reached``, then wait until PATH exists); N counts the step's passes (default 1).
Steps: ``start``, ``model`` (the CLI's checks), ``lock``, ``npy``, ``rows`` (while a shard's row
file is half written), ``part``, ``merge`` (while index.csv is written): see StoreHooks.
"""
import os
import signal
import sys
import time

from tsgb_ext.io import StoreHooks


class Failpoints(StoreHooks):
    def __init__(self, spec: str):
        self.plan = []
        for entry in spec.split(";"):
            key, _, action = entry.strip().partition("=")
            name, _, count = key.partition("@")
            self.plan.append((name, int(count or 1), action))
        self.counts = {}

    def reached(self, step: str) -> None:
        self.counts[step] = n = self.counts.get(step, 0) + 1
        for name, count, action in self.plan:
            if name == step and count == n:
                self.act(action)

    def write(self, step: str, f, data: bytes) -> None:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        self.reached(step)      # a kill while the file is half written
        f.write(data[half:])

    @staticmethod
    def act(action: str) -> None:
        if action == "kill":
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)
        elif action == "exit":
            os._exit(99)
        elif action == "interrupt":
            raise KeyboardInterrupt
        elif action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler raises KeyboardInterrupt here
        elif action.startswith("wait:"):
            path = action[5:]
            open(path + ".reached", "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            raise ValueError(f"failpoint action {action!r}")


if __name__ == "__main__":
    from tsgb_ext import cli
    sys.exit(cli.main(sys.argv[2:], hooks=Failpoints(sys.argv[1])))
