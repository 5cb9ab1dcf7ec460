"""A source that yields its chunks slowly, for the tests that kill a run half way (imported by
their subprocess scripts, which run with tests/ as the working directory)."""

import time

from lelp_fast.io import ArraySource


class SlowSource(ArraySource):
    def __init__(self, *args, delay: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def chunks(self, *args, **kwargs):
        for chunk in super().chunks(*args, **kwargs):
            time.sleep(self.delay)  # slow enough to be killed half way
            yield chunk
