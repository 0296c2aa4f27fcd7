"""Images of an NSD root that the subjects of a run never saw: the pool for synthetic-fMRI augmentation.

Brain-IT (reference_systems.md §b) trains its decoder on real examples plus the universal encoder's
predicted responses to extra images (the paper's EXT set). In NSD every 73k image belongs to some
subject's design, so the natural pool for a run is every 73k id that none of the run's subjects saw,
minus the shared1000 (the test images, never used for training in any form).

- Real roots: the images come from ``nsd_stimuli.hdf5`` (:class:`~brainenc.datasets.nsd.NSDStimuli`).
- Simulated roots: the simulator writes only the images its subjects see; any other id's image is the
  same pure function of the design seed (:func:`~brainenc.datasets.simulate.render_stimulus`), so the
  unseen images are rendered on demand and are exactly what that root would show.

Example
-------
>>> ids = unseen_image_ids(root, seen=np.concatenate([ds.image_ids for ds in datasets]), n=5000, seed=0)  # doctest: +SKIP
>>> block = read_images(root, ids[:64])                                          # uint8 [64, 425, 425, 3]  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from brainenc.datasets import layout
from brainenc.exceptions import DataFormatError

__all__ = ["unseen_image_ids", "read_images"]


def unseen_image_ids(root: str | Path, seen, n: int, seed: int = 0) -> np.ndarray:
    """``n`` 0-based 73k ids (ascending) outside ``seen`` and the shared1000, drawn with ``seed``.

    Parameters
    ----------
    root : path
        NSD root (its ``nsd_expdesign.mat`` gives the shared1000).
    seen : int array
        73k ids any subject of the run saw (e.g. every prepared dataset's ``image_ids``).
    n : int
        How many; more than the pool holds is an error naming both numbers.
    seed : int

    Returns
    -------
    int64 ndarray [n]
    """
    from brainenc.datasets.nsd import load_expdesign

    n = int(n)
    if n < 1:
        raise DataFormatError(f"'n' must be >= 1 unseen images; {n} was asked for")
    shared = load_expdesign(layout.expdesign_path(Path(root))).sharedix
    excluded = np.zeros(layout.N_IMAGES_73K, dtype=bool)
    seen = np.asarray(seen, dtype=np.int64).ravel()
    if seen.size and (seen.min() < 0 or seen.max() >= layout.N_IMAGES_73K):
        raise DataFormatError(f"'seen' must hold 0-based 73k ids; got {seen.min()}..{seen.max()}")
    excluded[seen] = True
    excluded[shared] = True
    pool = np.nonzero(~excluded)[0]
    if n > pool.size:
        raise DataFormatError(f"{root}: {n} unseen images asked for; only {pool.size} 73k ids are neither seen by "
                              "the run's subjects nor in the shared1000; ask for fewer, or use images from outside "
                              "NSD (the decode task's '[augment] images')")
    return np.sort(np.random.default_rng([int(seed), 0xE71]).choice(pool, size=n, replace=False)).astype(np.int64)


def read_images(root: str | Path, ids) -> np.ndarray:
    """The images of 73k ids ``ids`` of ``root``: uint8 ``[len(ids), 425, 425, 3]``, in ``ids`` order.

    A simulated root renders them (:func:`~brainenc.datasets.simulate.render_stimulus`); a real one
    reads its ``nsd_stimuli.hdf5``.
    """
    root = Path(root)
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if layout.simulation_manifest(root) is not None:
        from brainenc.datasets.simulate import render_stimulus

        if not ids.size:
            from brainenc.datasets._scenes import IMAGE_SIZE

            return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        return np.stack([render_stimulus(root, i) for i in ids.tolist()])
    from brainenc.datasets.nsd import NSDStimuli

    path = layout.stimuli_path(root)
    if not path.is_file():
        raise DataFormatError(f"{path}: missing; augmentation images come from the NSD stimuli file")
    return NSDStimuli(path).read(ids)
