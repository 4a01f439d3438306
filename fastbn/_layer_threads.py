"""What the stateful layers (fastbn.layers, fastbn.caffe) share about Python threads.

A layer may be called from several Python threads. What a forward saves for its backward
is kept per thread (a thread's backward always uses that thread's last forward), and every
update of the layer's own state (running statistics, step counts, accumulated gradients)
is made under the layer's lock, so concurrent calls never lose or mix updates.
"""
import threading

__all__ = ["PerThreadState"]


class PerThreadState:
    """Mixin: ``self._lock`` guards the layer's state, ``self._local`` holds the calling
    thread's saved forward. Neither is copied or pickled with the layer."""

    def _init_threads(self):
        self._lock = threading.Lock()
        self._local = threading.local()

    def _saved_get(self, name):
        """The calling thread's saved value `name` (None before its first forward)."""
        return getattr(self._local, name, None)

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"], state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_threads()
