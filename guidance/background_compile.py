"""Compile in a background thread while the caller keeps working on the uncompiled path.

torch.compile of the SD UNet and VAE encoder takes ~110 s on a fresh machine and ~26 s from a warm
Inductor cache (issue 20). Waiting for it before the first iteration makes a user stare at a silent
terminal; instead the training loop runs the same maths eagerly and adopts the compiled programs at
the first iteration boundary after they are ready. `BackgroundCompile` is that hand-over, and nothing
else: it runs one warm-up callable in a daemon thread and reports, when polled, whether it finished.

Safe-point rule: the owner polls only between iterations, so no iteration mixes the two paths, and
the compiled programs are first called (and CUDA-graphed) on the training thread after the
background thread is done. The background thread works on its own CUDA stream so that its kernels
never serialise with the training stream.

Why the training loop draws nothing from torch's global generators: while Dynamo traces a frame it
saves the global CPU and CUDA generator states and restores them when the frame is done
(torch/_dynamo/convert_frame.py, `preserve_global_state`). Draws another thread made meanwhile are
rewound and would repeat. Every random draw of a step therefore uses the trainer's own generators.

Why the GIL's switch interval is shortened while the thread runs: every torch op releases the GIL
while it dispatches, and CPython lets a waiting thread take it back only after the holder has run
for `sys.getswitchinterval()` (5 ms by default). Dynamo and Inductor are pure Python, so with the
default interval each op of the training thread waited up to 5 ms: on an H100 the uncompiled loop ran at
1020 ms/iteration beside the compilation instead of 133 ms. At 0.1 ms a tiny op beside a busy Python
thread costs ~35 us instead of ~1-2 ms, and the busy thread keeps ~80 % of its speed
(bench/gil_switch.py); the default is restored when the compilation ends. On the H100 the loop
beside the compilation then ran at ~630 ms/iteration (the CPU cores are shared with Inductor's compile
workers and gsplat's build too), still slower in total than compiling ahead: hence opt-in.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable

import torch

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 1e-4  # the GIL's switch interval while the compilation runs (see the module's docstring)


class BackgroundCompile:
    """Runs `warm_up()` once in a daemon thread; `poll()` says (once) when it has succeeded.

    warm_up: compiles and runs the programs once on inputs of the training shapes; it must not touch
        state the training thread reads (it gets private inputs) and must not capture CUDA graphs.
    name: what is compiled, for the log.
    device: the CUDA device the programs run on (the thread gets its own stream there); None on CPU.
    """

    def __init__(self, warm_up: Callable[[], None], name: str, device: torch.device | None = None):
        self._warm_up = warm_up
        self.name = name
        if device is not None and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # this thread's: set_device needs an index
        self.device = device if device is not None and device.type == "cuda" else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._adopted = False
        self.seconds: float | None = None  # how long the warm-up took, once it finished

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"the background compilation of {self.name} was already started")
        log.info("compiling %s in the background; training starts uncompiled and switches over when it is "
                 "ready (PipelineParams.compile_in_background=false waits for it instead)", self.name)
        self._thread = threading.Thread(target=self._run, name=f"compile {self.name}", daemon=True)
        self._default_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(SWITCH_INTERVAL_S, self._default_switch_interval))
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            if self.device is None:
                self._warm_up()
            else:
                torch.cuda.set_device(self.device)  # the current device is per thread
                stream = torch.cuda.Stream(self.device)
                with torch.cuda.stream(stream):
                    self._warm_up()
                stream.synchronize()
        except BaseException as exc:  # reported on the training thread by poll()
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - t0
            sys.setswitchinterval(self._default_switch_interval)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> bool:
        """True exactly once: at the first call after the warm-up succeeded (adopt the programs now).
        A failed warm-up is logged once and never adopted: training goes on uncompiled."""
        if self._adopted or self._thread is None or self._thread.is_alive():
            return False
        self._adopted = True
        if self._error is not None:
            log.warning("compiling %s failed after %.1f s (%s: %s); training goes on uncompiled "
                        "(PipelineParams.compile=false skips the attempt)", self.name, self.seconds,
                        type(self._error).__name__, self._error)
            return False
        log.info("%s compiled in the background in %.1f s: switching to the compiled programs",
                 self.name, self.seconds)
        return True

    def join(self) -> None:
        """Block until the warm-up is done (poll() then says whether to adopt its programs)."""
        if self._thread is not None:
            self._thread.join()
