"""``iaflash-provision model``: install bundles side by side, switch atomically, list, roll back, reload.

Layout (docs/BUNDLES.md#installing-switching-and-rolling-back)::

    <model.store_dir>/<name>/<version>/     one installed bundle (manifest.json, manifest.sig, ...)
    <model.store_dir>/.store.json           per slot: versions in install order, history, highest version
    <model.bundle>  -> <store_dir>/<name>/<version>    the stable path the agent loads (a symlink)

- :mod:`.order`: the version order and the downgrade check (swappable for the engines' rollback rules);
- :mod:`.source`: a bundle folder or archive staged into the store, safely;
- :mod:`.store`: the state file, the lock, the atomic switch, pruning;
- :mod:`.install`: install, rollback and list, step by step;
- :mod:`.agent`: the running agent (pid from its lock), SIGHUP and its report of the reload;
- :mod:`.cli`: the Click commands.
"""
