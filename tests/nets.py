"""Randomised segmentation nets for export and parity tests (needs torch)."""


def randomised_net(arch: str, widths, seed: int = 0):
    """An eval-mode net whose batch-norm layers are not the identity (random statistics), so export and parity
    tests exercise them."""
    import torch

    from latticewatch.models.architectures import build_net

    torch.manual_seed(seed)
    return _randomise_batch_norm(build_net(arch, widths))


def randomised_cnn(seed: int = 0):
    """A small eval-mode crop CNN (3 channels, 5 classes, widths 4-8) with random batch-norm statistics and a
    head scaled up so its probabilities are far from uniform (some regions confident, some not)."""
    import torch

    from latticewatch.models.architectures import build_classifier

    torch.manual_seed(seed)
    net = _randomise_batch_norm(build_classifier("crop-cnn", 3, 5, widths=(4, 8)))
    with torch.no_grad():
        net.head.weight.mul_(8.0)
    return net


def _randomise_batch_norm(net):
    import torch

    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net.eval()
