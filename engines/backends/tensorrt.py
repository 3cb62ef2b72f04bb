"""TensorRT engines: torch CUDA tensors in, torch CUDA tensors out, no host copies.

Each engine deserializes its plan once and owns one execution context. Inputs are bound in place with
``set_tensor_address`` (converted to the engine's dtypes on the GPU first), outputs are allocated from the context's
output shapes, and ``execute_async_v3`` runs on the caller's current torch CUDA stream, so every engine of a pipeline
runs on that one stream in order. Activation memory is shared: engines on one device draw their scratch memory from
one buffer sized for the largest of them (contexts are created with the USER_MANAGED allocation strategy and given
that buffer with ``set_device_memory``), which is safe because they run one after another on one stream. Engines
built with static shapes may capture a CUDA graph per input shape and replay it (``cuda_graph=True``).

Loading checks that the engine was built for this GPU and TensorRT version (see diffaccel.engines.backends.tensorrt_env) and
fails with a one-line error that says how to rebuild. ``import`` of this module never imports tensorrt.

>>> torch_dtype_name("HALF"), torch_dtype_name("INT64")
('float16', 'int64')
"""
from __future__ import annotations

import weakref
from pathlib import Path

from diffaccel.optimize.artifact.errors import ArtifactError, DiffaccelError

_TRT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                 "INT32": "int32", "INT64": "int64", "BOOL": "bool"}


def torch_dtype_name(trt_dtype) -> str:
    """torch dtype name of a TensorRT ``DataType`` (or its name)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    try:
        return _TRT_TO_TORCH[name]
    except KeyError:
        raise DiffaccelError(f"engine tensors of type {name} are not supported; supported: "
                             f"{', '.join(_TRT_TO_TORCH)}") from None


class SharedDeviceMemory:
    """One activation buffer per CUDA device, as large as the largest engine using it. ``version`` changes when it
    grows, so engines re-bind it (and drop CUDA graphs that captured the old address)."""

    _pools: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()

    def __init__(self, device):
        self.device, self.buffer, self.version = device, None, 0

    @classmethod
    def for_device(cls, device) -> "SharedDeviceMemory":
        pool = cls._pools.get(str(device))
        if pool is None:
            pool = cls(device)
            cls._pools[str(device)] = pool
        return pool

    def reserve(self, nbytes: int) -> None:
        import torch

        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=self.device)
            self.version += 1

    @property
    def address(self) -> int:
        return self.buffer.data_ptr()

    @property
    def size(self) -> int:
        return self.buffer.numel()


class TrtEngine:
    """One TensorRT engine behind the engine protocol (named torch tensors in and out)."""

    def __init__(self, engine, name: str, device, cuda_graph: bool = False, shared_memory: bool = True):
        import tensorrt as trt
        import torch

        self._trt, self.engine, self.name = trt, engine, name
        dev = torch.device(device)
        self._device = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._dtypes = {n: getattr(torch, torch_dtype_name(engine.get_tensor_dtype(n))) for n in names}
        strategy = trt.ExecutionContextAllocationStrategy
        self.memory = SharedDeviceMemory.for_device(self._device) if shared_memory else SharedDeviceMemory(
            self._device)
        self.memory.reserve(engine.device_memory_size_v2)
        self.context = engine.create_execution_context(strategy.USER_MANAGED)
        if self.context is None:
            raise DiffaccelError(f"TensorRT could not create an execution context for {name} (out of GPU memory?)")
        self._bound_version = None
        self.cuda_graph = cuda_graph
        self._graphs = {}

    @classmethod
    def from_bytes(cls, plan: bytes, name: str, device="cuda", **options) -> "TrtEngine":
        import tensorrt as trt

        from diffaccel.engines.backends.tensorrt_env import BuildLog, make_logger

        sink = BuildLog()
        logger = make_logger(trt, sink, "WARNING")
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            detail = (sink.errors() or ["no reason given"])[-1]
            raise ArtifactError(f"TensorRT could not load the {name} engine ({detail[:300]}); rebuild it with "
                                "diffaccel optimize --backend tensorrt --force")
        out = cls(engine, name, device, **options)
        out._keep = (runtime, logger, sink)     # the runtime (and its logger) must outlive the engine
        return out

    @property
    def device(self):
        return self._device

    def _bind_memory(self) -> None:
        if self._bound_version != self.memory.version:
            self.context.set_device_memory(self.memory.address, self.memory.size)
            self._bound_version = self.memory.version
            self._graphs.clear()

    def _feeds(self, inputs: dict) -> dict:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise DiffaccelError(f"{self.name} engine needs input(s) {', '.join(missing)}")
        return {n: inputs[n].to(self._device, self._dtypes[n]).contiguous() for n in self.input_names}

    def _bind(self, feeds: dict) -> dict:
        import torch

        for name, t in feeds.items():
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise DiffaccelError(f"{self.name} engine cannot take {name} of shape {tuple(t.shape)}; it serves "
                                     "the profile in its manifest entry (rebuild with other --batch/--height/--width)")
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n], device=self._device)
                for n in self.output_names}
        for name, t in outs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        return outs

    def _execute(self) -> None:
        import torch

        stream = torch.cuda.current_stream(self._device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise DiffaccelError(f"TensorRT failed to run the {self.name} engine; see the log above")

    def __call__(self, **inputs) -> dict:
        import torch

        with torch.cuda.device(self._device):
            self._bind_memory()
            feeds = self._feeds(inputs)
            if self.cuda_graph:
                outs = self._replay(feeds)
            else:
                outs = self._bind(feeds)
                self._execute()
        return {n: (t.float() if t.is_floating_point() and t.dtype != torch.float32 else t) for n, t in outs.items()}

    def _replay(self, feeds: dict) -> dict:
        """CUDA graph per input-shape key: static input/output buffers, captured after one warm-up run."""
        import torch

        key = tuple((n, tuple(t.shape)) for n, t in feeds.items())
        entry = self._graphs.get(key)
        if entry is None:
            static_in = {n: t.clone() for n, t in feeds.items()}
            static_out = self._bind(static_in)
            self._execute()                        # flushes shape-dependent setup before capture
            torch.cuda.current_stream(self._device).synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._execute()
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        for n, t in feeds.items():
            static_in[n].copy_(t)
        graph.replay()
        return {n: t.clone() for n, t in static_out.items()}


def load(root, component: str, entry: dict, device: "str | None" = None, cuda_graph: "bool | None" = None,
         shared_memory: bool = True, **_ignored) -> TrtEngine:
    """Load the engine of ``component`` after checking it was built for this GPU and TensorRT version."""
    from diffaccel.engines.backends.tensorrt_env import check_engine_compatible, probe_environment

    import torch

    trt_entry = entry.get("tensorrt")
    if not trt_entry:
        raise ArtifactError(f"{root}: {component} has no TensorRT build record; rebuild with diffaccel optimize "
                            "--backend tensorrt --force")
    dev = torch.device(device or "cuda")
    env = probe_environment(dev.index or 0)
    check_engine_compatible(component, trt_entry, env, root)
    graph = bool(trt_entry.get("cuda_graph")) if cuda_graph is None else bool(cuda_graph)
    if graph and not trt_entry.get("static_shapes"):
        raise DiffaccelError(f"CUDA graphs need an engine built with static shapes; {component} was not "
                             "(rebuild with --static-shapes, or load with cuda_graph=False)")
    plan = (Path(root) / entry["engine"]).read_bytes()
    return TrtEngine.from_bytes(plan, component, dev, cuda_graph=graph, shared_memory=shared_memory)
