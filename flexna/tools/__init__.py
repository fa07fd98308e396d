"""The tools wing of flexna: the ``flexna`` command line, pictures, the fuzzer, the catalogue, the demo.

Nothing in the core (``flexna/*.py``) imports this subpackage. The tools use the core
only through its public names: the top-level ``flexna`` exports, ``flexna.pattern``,
``flexna.geometry``, ``flexna.layout``, ``flexna.reference`` and
``flexna.blockmask.resolve_block_sizes``. The catalogue (``flexna.tools.masks``) is
package data, read with :mod:`importlib.resources`.
"""
