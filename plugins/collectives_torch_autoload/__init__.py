"""torch's backend autoload entry point (the ``torch.backends`` entry-point group, which
``import torch`` runs): registers the torch.distributed backend "collectives", so that
``dist.init_process_group("collectives")`` works without ``import collectives.torch``.

Installed as a top-level package of its own, not inside ``collectives``: torch imports it while
``import torch`` is still running, so it imports nothing of collectives (collectives.torch is
imported when a group is first made), and it never raises (an entry point that raises fails
every ``import torch``). TORCH_DEVICE_BACKEND_AUTOLOAD=0 turns autoloading off."""

BACKEND = "collectives"


def register() -> None:
    try:
        import torch.distributed as dist

        if not dist.is_available() or BACKEND in dist.Backend.backend_list:
            return
        import torch

        dist.Backend.register_backend(BACKEND, _create, extended_api=True,
                                      devices=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    except Exception:  # noqa: BLE001 - see the module's docstring
        pass


def _create(options, pg_options):
    from collectives.torch._process_group import create  # registers nothing twice (collectives.torch checks)

    return create(options, pg_options)
