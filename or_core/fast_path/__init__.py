"""The fast path: what the training code does only to run faster, set apart from the plain path.

Each trick keeps the results of the plain computation (a resumed run stays bit-identical) and
changes only how often the host waits for the device or how many calls it issues. One line
each: what, why, and where its measurement lives in ``results/benchmarks/NOTES.md``.

* :mod:`~or_core.fast_path.host_counters`, host-sync avoidance: counters read every step (a
  memory bank's write pointer, SwaV's queued count) are mirrored on the host, since reading a
  CUDA value waits for all queued GPU work (``#host-sync-avoidance``).
* :mod:`~or_core.fast_path.compiled_calls`, compiled calls: the backbone and its EMA copies are
  compiled (CUDA graphs with ``reduce-overhead``), since a GPU step is bound by the host's
  kernel launches; evaluation runs them eagerly (``#compiled-gpu-step``).
* :mod:`~or_core.fast_path.deferred_checks`, deferred checks: NaN/inf checks of the losses are
  read every 50 steps on a GPU and those of the weights in one read, since each read waits for
  the device (``#deferred-checks``).
* :mod:`~or_core.fast_path.batched_views`, batched augmentation calls: ``augment_batches``
  batches augmented in one call, since a call's ~1,300 small ops cost host time whatever the
  batch size (``#batched-augmentation-gpu``).

The plain path calls in here once per trick, naming the module:
:func:`or_core.train.train_epoch` takes its views from :func:`.batched_views.step_views` and its
loss checks from :class:`.deferred_checks.DeferredLossCheck`,
:func:`or_core.train.optimization_step` marks each step for CUDA graphs
(:func:`.compiled_calls.mark_step_begin`), :func:`or_core.training_run.build_run` compiles
(:func:`.compiled_calls.compile_encoders`), evaluation runs :func:`.compiled_calls.eager`, and the
methods with memory banks or queues keep their counters with
:func:`.host_counters.enqueue_without_host_sync` and :func:`.host_counters.read_counter`.

The package imports none of its modules: each caller imports the one it needs (only
``host_counters`` needs lightly, which tables and figures of run directories do not load).
"""
