"""How far a model's next-token distributions are from a reference model's: KL divergence and top-1 agreement."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) in nats for every position ([..., vocab] -> [...]), computed in float32."""
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    test = torch.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - test)).sum(-1)


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """True where both models' most likely next token is the same ([..., vocab] -> bool [...])."""
    return ref_logits.argmax(-1) == logits.argmax(-1)


@dataclass
class DivergenceMeter:
    """Running mean KL and top-1 agreement over batches of positions."""

    kl_sum: float = 0.0
    agree: int = 0
    count: int = 0

    def update(self, ref_logits: torch.Tensor, logits: torch.Tensor) -> None:
        """Add every position of a pair of logits tensors of the same shape."""
        if ref_logits.shape != logits.shape:
            raise ValueError(f"logits shapes differ: {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
        self.kl_sum += kl_divergence(ref_logits, logits).sum().item()
        self.agree += int(top1_agreement(ref_logits, logits).sum())
        self.count += ref_logits[..., 0].numel()

    @property
    def kl(self) -> float:
        """Mean KL(reference || model) per position, in nats."""
        return self.kl_sum / max(self.count, 1)

    @property
    def top1(self) -> float:
        """Fraction of positions where the top-1 tokens agree."""
        return self.agree / max(self.count, 1)
