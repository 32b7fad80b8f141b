"""Run callables in threads started together; what they return, errors raised in the caller."""

import threading


def run_together(fns):
    """Call each of ``fns`` in its own thread, all released at once by a barrier; returns
    their results in order, or raises the first error one of them raised."""
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def worker(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise AssertionError(f"{len(errors)} of {len(fns)} threads raised: {errors!r}") from errors[0]
    return results
