"""What every stage replica does the same way: pick its device and dtype, bound its CPU threads, load only its
own weights, and describe what it holds (for `/health` and the tests)."""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from ray.actor import ActorHandle
from torch import nn

from common.checkpoint import STAGE_PREFIXES, built_on_meta, load_stage_weights
from common.config import OmniConfig, load_config
from deployments.settings import ServiceSettings
from deployments.timeline import StageClock, StageTimes

logger = logging.getLogger("ray.serve")  # Serve writes it to the replica's log, with its request context

# Deployment options in code are the CPU defaults (a laptop, the tests): a fraction of a core per replica, since
# Serve reserves one CPU per replica otherwise and six replicas would not fit on two cores. Serve config files
# override them (num_gpus: 1 per stage, autoscaling).
STAGE_DEFAULTS = {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 16}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stage_device(settings: ServiceSettings) -> torch.device:
    """cuda when asked for, or when Ray gave this replica a GPU; else cpu."""
    if settings.device is not None:
        return torch.device(settings.device)
    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")


def stage_dtype(settings: ServiceSettings, device: torch.device) -> torch.dtype:
    if settings.dtype is not None:
        return _DTYPES[settings.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def configure_torch(settings: ServiceSettings) -> None:
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    torch.set_grad_enabled(False)


def send_tensors_as_arrays() -> None:
    """Make this process's Ray messages carry host tensors as numpy arrays of their bytes.

    Ray pickles a tensor through torch's own reduce (torch.save's format): about 0.25 ms to send and 0.25 ms to
    receive even a [1, H] one on a loaded 2-core CPU, for every tensor of every message (the job down the call
    chain, each TalkerInput, each CodecFrames). A numpy array goes through pickle 5's out-of-band buffers, about
    ten times cheaper. Only the sender needs this: the stream names the function that rebuilds the tensor."""
    ray.util.register_serializer(torch.Tensor, serializer=_tensor_to_wire, deserializer=_tensor_from_wire)


def _tensor_to_wire(tensor: torch.Tensor) -> tuple:
    if tensor.device.type != "cpu" or tensor.layout != torch.strided:
        return (pickle.dumps(tensor),)  # torch's own pickling (rare: messages leave a GPU stage on the host)
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy(), tensor.dtype, tuple(tensor.shape)


def _tensor_from_wire(wire: tuple) -> torch.Tensor:
    if len(wire) == 1:
        return pickle.loads(wire[0])
    data, dtype, shape = wire
    if data.size == 0:  # an empty buffer comes back with stride 0, which no view takes
        return torch.empty(shape, dtype=dtype)
    if not data.flags.writeable:  # a view of the object store's buffer: a stage may write into what it receives
        data = np.array(data)
    return torch.from_numpy(data).view(dtype).reshape(shape)


async def all_ready(queue: asyncio.Queue) -> list:
    """Every item of `queue` that is there: one at least (waited for), then those already behind it."""
    ready = [await queue.get()]
    while not queue.empty():
        ready.append(queue.get_nowait())
    return ready


def describe(stage: str, module: nn.Module) -> dict:
    """What a replica holds: its hub prefixes and its number of weight elements (parameters and persistent
    buffers), so a test can check them against the checkpoint's tensors under those prefixes."""
    elements = sum(t.numel() for t in module.state_dict().values())
    return {"stage": stage, "hub_prefixes": list(STAGE_PREFIXES[stage]), "weight_elements": elements}


@dataclass
class LoadedStage:
    config: OmniConfig
    checkpoint: Path
    module: nn.Module
    device: torch.device
    dtype: torch.dtype


def load_stage(
    settings: ServiceSettings,
    stage: str,
    build: Callable[[OmniConfig], nn.Module] | None = None,
    load: Callable[[Path, OmniConfig, torch.dtype, torch.device], nn.Module] | None = None,
    extra_prefixes: tuple[str, ...] = (),
) -> LoadedStage:
    """Load one stage's module with only its own tensors (`STAGE_PREFIXES[stage]`).

    Either `build` (the module on the meta device; its weights are then loaded here) or `load` (a stage's own
    loader, for the talker which also copies three rows of the thinker's embedding table: `extra_prefixes`
    names the hub tensors it reads beyond its prefix, so a hub download fetches their shards).
    """
    configure_torch(settings)
    device = stage_device(settings)
    dtype = stage_dtype(settings, device)
    prefix_map = STAGE_PREFIXES[stage]
    ckpt = settings.checkpoint_dir(prefixes=[*prefix_map, *extra_prefixes])
    config = load_config(ckpt)
    if load is not None:
        module = load(ckpt, config, dtype, device)
    else:
        with built_on_meta():
            module = build(config)
        load_stage_weights(module, ckpt, prefix_map, dtype, device)
    logger.info("%s: loaded %s from %s on %s", stage, type(module).__name__, ckpt, device)
    return LoadedStage(config, ckpt, module.eval(), device, dtype)


class StageReplica:
    """What every stage deployment shares: its loaded stage, the service metrics, the requests it is serving now
    (a request ends here when it finishes, fails or is cancelled by a client that went away), and the methods the
    ingress and the tests call on any stage."""

    stage_name: str

    def _start(self, settings: ServiceSettings, **load_args) -> None:
        # Serve's metrics and replica context: not imported by the batch job's actors
        from deployments.metrics import service_metrics
        from deployments.resume import this_replica

        send_tensors_as_arrays()
        self.settings = settings
        self.stage = load_stage(settings, self.stage_name, **load_args)
        self.metrics = service_metrics()
        self.in_flight: set[str] = set()
        self.served = 0  # requests this replica has taken on since it started
        self.engine = None  # the thinker, talker and code2wav set their batching engine here
        self.in_engine = 0  # requests in the engine: decoding in its batch or waiting for a row
        self.actor = this_replica()  # named in the calls to the stage it reads, which stops once this is dead

    @contextmanager
    def serving(self, request_id: str):
        """While the replica serves a request; yields the request's clock for this stage (`deployments.timeline`).
        What the stage produced for it (`clock.outputs`) goes to the metrics when it ends, in one call: a Ray metric
        call per message cost the stage's event loop about as much as the message's own handling."""
        self.metrics.stage_requests.inc(1, tags={"stage": self.stage_name})
        self.served += 1
        self.in_flight.add(request_id)
        clock = StageClock(request_id, self.stage_name)
        try:
            yield clock
        finally:
            self.in_flight.discard(request_id)
            self.metrics.stage_tokens(self.stage_name, clock.outputs)

    def finish_times(self, clock: StageClock) -> StageTimes:
        """The stage's times for the request, after its last event (the stages downstream forward them to the
        ingress); its queue wait and time to first output go to the metrics here."""
        clock.mark("done")
        self.metrics.stage_times(clock)
        return clock.times()

    def while_consumer_lives(self, request_id: str, events: AsyncIterator, consumer: ActorHandle | None):
        """The events of one of this stage's streams while `consumer`, the replica reading it, is alive
        (`deployments.resume`): once it is dead, the reply is cancelled here."""
        from deployments.resume import while_consumer_lives

        return while_consumer_lives(request_id, events, consumer, self.settings.consumer_check_s)

    async def engine_steps(self, request_id: str, submit: Callable[[Callable], None], clock: StageClock):
        """The steps the replica's batching engine hands one request, on this event loop: each item is every step
        that is ready (one at least), so a consumer that fell behind the engine catches up in one message, and
        none waits for a step that is not there yet. `submit(sink)` queues the request with `sink`, which the
        engine calls on its thread; the request leaves the engine when it finishes, fails, or its consumer goes
        away (the engine frees its row before the next step)."""
        loop, steps = asyncio.get_running_loop(), asyncio.Queue()
        submit(lambda step: loop.call_soon_threadsafe(steps.put_nowait, step))
        clock.mark("submitted")
        with self.in_engine_for(request_id):
            while True:
                ready = await all_ready(steps)
                clock.mark("admitted")  # the engines tell of admission only by the first step (prefill done)
                for step in ready:
                    if isinstance(step, BaseException):
                        raise step
                yield ready
                if ready[-1].finish_reasons[0] is not None:
                    return

    @contextmanager
    def in_engine_for(self, request_id: str):
        """While a submitted request is in the replica's engine: counted in the batch gauge, and cancelled in the
        engine when it leaves here (finished, failed, or its consumer gone: the engine frees its row)."""
        self.in_engine += 1
        self.metrics.batch(self.stage_name, self.in_engine)
        try:
            yield
        finally:
            self.engine.cancel(request_id)
            self.in_engine -= 1
            self.metrics.batch(self.stage_name, self.in_engine)

    async def check_health(self) -> None:
        """Serve's periodic replica health check (a replica that fails it is replaced, and `/health` names the
        stage meanwhile): a batching engine whose thread has stopped would leave every request it holds waiting.
        A coroutine: Serve runs a plain method in an anyio worker thread, which idles out (10 s) before the next
        check (every 10 s) and is started anew while the event loop waits, tens of milliseconds on a loaded machine,
        in the middle of the replies this replica relays."""
        if self.engine is not None and not self.engine.healthy():
            raise RuntimeError(f"{self.stage_name}: the batching engine's thread has stopped")

    def describe(self) -> dict:
        """What the replica holds (prefixes, weight elements), the ids of the requests it is serving, and of those
        decoding in its batch now (None for a stage without a batching engine); which replica it is (Serve's id) and
        how many requests it has taken on, so a caller that asks repeatedly through the handle can tell how Serve
        spread the requests over the stage's replicas."""
        from ray import serve

        batch = self.engine.active if self.engine is not None else None
        replica = serve.get_replica_context().replica_id.to_full_id_str()
        return {**describe(self.stage_name, self.stage.module), "replica": replica, "served": self.served,
                "in_flight": sorted(self.in_flight), "batch": batch}
