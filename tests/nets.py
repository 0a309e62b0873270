"""Randomised segmentation nets for export and parity tests (needs torch)."""


def randomised_net(arch: str, widths, seed: int = 0):
    """An eval-mode net whose batch-norm layers are not the identity (random statistics), so export and parity
    tests exercise them."""
    import torch

    from latticewatch.models.architectures import build_net

    torch.manual_seed(seed)
    net = build_net(arch, widths)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net.eval()
