"""``iaflash-provision model``: install bundles side by side, switch atomically, list, roll back, reload.

Layout (docs/BUNDLES.md#models-on-a-box)::

    <model.store_dir>/<name>/<version>/     one installed bundle (manifest.json, manifest.sig, ...)
    <model.store_dir>/.store.json           per slot: versions in install order, history of switches
    <model.bundle>  -> <store_dir>/<name>/<version>    the stable path the agent loads (a symlink)

Versions only go up per name (the engines' rule, :func:`iaflash.engines.rollback.check_bundle_version`,
applied through ``load_trusted_bundle`` with the box's trust state); ``model rollback`` to a
version still installed is the technician's explicit exception, recorded in the trust state.

- :mod:`.source`: a bundle folder or archive staged into the store, safely;
- :mod:`.store`: the state file, the lock, the atomic switch, pruning;
- :mod:`.install`: install, rollback and list, step by step;
- :mod:`.agent`: the running agent (pid from its lock), SIGHUP and its report of the reload;
- :mod:`.cli`: the Click commands.
"""
