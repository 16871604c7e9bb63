"""Device tensors bound for the wire, copied to the host inside the compute stream.

On a GPU the copy goes into pinned buffers (reused, grown as needed) with a
non-blocking copy ordered on the compute stream, and the compute thread waits for it:
the event loop never touches device memory or waits on the GPU, and a compute job's
end on the timeline is the end of its GPU work.  On the CPU there is nothing to copy.

A buffer is reused by the next call with the same tag, so a caller must not send the
next tensors of a tag before the last ones left (the dense worker sends a micro-batch's
next request only after the reply to its last one).
"""

from __future__ import annotations

import torch

__all__ = ["HostStaging"]


class HostStaging:
    """Host copies of one micro-batch's outgoing tensors."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}

    def to_host(self, *tensors: torch.Tensor, tag: str = "") -> tuple[torch.Tensor, ...]:
        """Contiguous host tensors with the values of ``tensors`` (the tensors themselves
        when they are already contiguous host tensors)."""
        if self.device.type == "cpu":
            return tuple(t.contiguous() for t in tensors)
        out = []
        for i, t in enumerate(tensors):
            buf = self._buffers.get((tag, i))
            if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
                buf = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
                self._buffers[(tag, i)] = buf
            host = buf[: t.numel()].view(t.shape)
            host.copy_(t, non_blocking=True)
            out.append(host)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return tuple(out)
