"""``python -m manifold_lab``: the ``manifold-lab`` command (:mod:`manifold_lab.command`)."""

from manifold_lab.command import entry

if __name__ == "__main__":
    entry()
