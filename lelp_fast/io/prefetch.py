"""Read ahead: produce the next items of an iterator in a background thread.

File reads and BLAS calls release the GIL, so reading chunk i+1 overlaps the statistics of chunk i.
Exceptions raised while producing are re-raised in the consumer, in order; closing the consumer
(break, error) stops the producer.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yields ``items`` in order while up to ``depth`` further items are produced in a thread."""
    if depth <= 0:
        yield from items
        return
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Raised(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="lelp-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
