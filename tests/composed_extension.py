"""A worker extension of "another framework" composed with draftadapt's (imported by vLLM by name)."""
from draftadapt.engine.swap_worker import DraftSwapExtension


class OtherFrameworkExtension:
    """Stands for verl's / NeMo-RL's / OpenRLHF's own extension: its own methods and state."""

    def other_framework_ping(self, value: int) -> tuple:
        self._other_calls = getattr(self, "_other_calls", 0) + 1
        return value + 1, self._other_calls, type(self.model_runner.get_model()).__name__


class ComposedExtension(OtherFrameworkExtension, DraftSwapExtension):
    """What a framework writes: `class MyExt(MyFrameworkExt, DraftSwapExtension): pass`."""
