"""Memory layouts shared by the backends and the ops layer (API.md: an output keeps x's layout, a parameter's
gradient the parameter's layout and dtype)."""
import torch


def out_format(t: torch.Tensor):
    """channels_last_3d when t is laid out that way (and is not also plain contiguous), else contiguous."""
    cl = t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
    return torch.channels_last_3d if cl else torch.contiguous_format


def as_param(grad, param):
    """A parameter's gradient in the parameter's dtype and layout, copied only where it differs (None stays None).
    param: the parameter, or for a bias the weight (the ops layer gives them one dtype)."""
    fmt = out_format(param) if grad is not None and grad.dim() == param.dim() else torch.contiguous_format
    if grad is None or (grad.dtype == param.dtype and grad.is_contiguous(memory_format=fmt)):
        return grad
    return torch.empty(grad.shape, dtype=param.dtype, device=grad.device, memory_format=fmt).copy_(grad)
