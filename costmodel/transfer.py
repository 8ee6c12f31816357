"""Moving a request's KV cache between workers (prefill/decode disaggregation).

Each tensor-parallel rank holds its shard of the KV cache (its KV heads, every layer) and sends
it over its own link, and each rank of the receiving worker takes its own shard over its own,
so a transfer of P tokens takes

    latency_s + P x max(sender's, receiver's, receiver's x receiver TP / sender TP) / bytes_per_s

in KV bytes per token per GPU, all ranks at once: the side with fewer GPUs per KV head bounds
it, and where the receiver's TP exceeds the KV heads (each head on several GPUs) every copy
leaves a sender's link. Across nodes the link is the GPU's network
port: DGX/HGX H100, H200 and B200 pair every GPU with one 400 Gb/s ConnectX-7 port (50 GB/s
one way), DGX A100 with one 200 Gb/s HDR port (25 GB/s); 10 us is the point-to-point latency the
AIConfigurator collector assumes on its H100/H200 systems (`../shared/gpu-data/kernels/systems/
*.yaml`: `inter_node_bw: 50000000000`, `p2p_latency: 0.00001`). Within a node it is NVLink, one
direction: half the bidirectional figure of costmodel/gpu.py. These are datasheet figures, not
measurements: what a transfer reaches in practice (RDMA efficiency, NIXL's overheads) is a
guess until measured, and `KVLink` takes any other figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from costmodel.errors import ConfigError
from costmodel.gpu import load_gpu

if TYPE_CHECKING:
    from costmodel.price import CostModel

# per GPU, one direction: (bytes/s, where the figure comes from)
NETWORK_BYTES_PER_S = {
    "a100": (25e9, "one 200 Gb/s HDR port per GPU (DGX A100)"),
    "h100": (50e9, "one 400 Gb/s ConnectX-7 port per GPU (DGX H100)"),
    "h200": (50e9, "one 400 Gb/s ConnectX-7 port per GPU (HGX H200)"),
    "b200": (50e9, "one 400 Gb/s ConnectX-7 port per GPU (DGX B200)"),
}
NETWORK_LATENCY_S = 10e-6


@dataclass(frozen=True)
class KVLink:
    """One GPU's link to the other pool: bandwidth one way, latency per transfer, and whence."""

    bytes_per_s: float
    latency_s: float
    source: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bytes_per_s) and self.bytes_per_s > 0):
            raise ConfigError(f"KV link bandwidth must be a finite number > 0, got {self.bytes_per_s}")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ConfigError(f"KV link latency must be a finite number >= 0, got {self.latency_s}")


def kv_link(gpu: str, same_node: bool = False) -> KVLink:
    """The preset link of `gpu`: its network port across nodes, NVLink within one."""
    spec = load_gpu(gpu)
    if same_node:
        return KVLink(spec.link_bytes_per_s / 2, 0.0, f"NVLink, half of {spec.name}'s "
                      f"{spec.link_bytes_per_s / 1e9:g} GB/s bidirectional (datasheet)")
    if spec.name not in NETWORK_BYTES_PER_S:
        raise ConfigError(f"no network figure for {spec.name}: give the link's bandwidth "
                          f"(presets: {', '.join(NETWORK_BYTES_PER_S)})")
    bw, source = NETWORK_BYTES_PER_S[spec.name]
    return KVLink(bw, NETWORK_LATENCY_S, source)


def transfer_s(cost_model: CostModel, num_tokens: int, link: KVLink, num_layers: int | None = None,
               receiver: CostModel | None = None) -> float:
    """Seconds to send `num_tokens` tokens' KV cache through `num_layers` layers (default: all)
    from a worker of `cost_model` to one of `receiver` (default: the same parallelism; see the
    module note; every layer holds the same KV per token); no time for nothing."""
    layers = cost_model.model.num_layers
    num_layers = layers if num_layers is None else num_layers
    if num_tokens <= 0 or num_layers <= 0:
        return 0.0
    per_token = cost_model.kv_bytes_per_token_per_gpu
    if receiver is not None:  # every receiving GPU's copy leaves some sender's link
        into = receiver.kv_bytes_per_token_per_gpu
        out = into * receiver.parallel.tp / cost_model.parallel.tp
        per_token = max(per_token, out, into)
    return link.latency_s + num_tokens * per_token * num_layers / layers / link.bytes_per_s
