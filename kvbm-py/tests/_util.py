"""Helpers shared by the test modules (importable: pytest puts this folder on sys.path)."""

import threading


def conserved(m):
    """Checks the manager's invariants and that every block is in exactly one place; returns
    its counts."""
    c = m.check_invariants()
    assert c["reset"] + c["inactive"] + c["mutable"] + c["active"] == c["total"]
    return c


def run_threads(worker, n=4):
    """Runs `worker(t)` for t in range(n), each on its own thread, all released at once by a
    barrier; fails if any of them raised (with what they raised)."""
    start = threading.Barrier(n)
    errors = []

    def run(t):
        try:
            start.wait()
            worker(t)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
