"""The two regularizers of the paper's random search (appendix A) that BiT-HyperRule leaves out.

    dropout on the pre-logits : logits = head(dropout_p(features)), training only
    decay towards the init    : loss += wd/2 * sum ||w - w0||^2 over all parameters, w0 = the weights the run
                                started from (pre-trained backbone + zero head), so grad += wd * (w - w0)

Both leave the model's modules and state_dict keys untouched: dropout is a forward pre-hook on `model.head`, the
decay is added to the gradients before the optimizer step. w0 is taken before a resume loads the checkpoint, so
a resumed run still pulls towards the pre-trained weights.
"""
import torch
import torch.nn.functional as F


def add_prelogit_dropout(model, p):
    """Dropout with rate p on the input of `model.head` (the pre-logits) while training."""
    if p <= 0:
        return None
    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"dropout={p}: needs a model with a .head module (a bitfast zoo model)")
    return head.register_forward_pre_hook(lambda m, args: (F.dropout(args[0], p, m.training), *args[1:]))


class DecayToInit:
    """grad += wd * (w - w0) for every trainable parameter; w0 is a copy taken at construction."""

    def __init__(self, model, wd):
        self.wd = wd
        self.pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def apply(self):
        for p, p0 in self.pairs:
            if p.grad is not None:
                p.grad.add_(p - p0, alpha=self.wd)

    def penalty(self):  # wd/2 * sum ||w - w0||^2 (for tests and logs)
        return 0.5 * self.wd * sum(float((p.detach() - p0).pow(2).sum()) for p, p0 in self.pairs)
