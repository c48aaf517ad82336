"""Write command outputs without destroying data: one module for every command.

Check the target first, before any long work, then write it::

    from mlx_evit.outputs import OutputError, check_output_file

    target = check_output_file(args.output, inputs=image_files, force=True)  # raises OutputError
    ...  # the long work
    target.write_text(report)                  # or: with target.open() as stream: stream.write(...)

Folders of outputs (one file per input, e.g. ``segment --output-dir``)::

    out = check_output_dir(args.output_dir, inputs=files, force=args.force)
    out.write_file("cat.png", png_bytes)        # each file atomic; missing folders created

A folder written as a whole and swapped into place (``convert OUT_DIR``)::

    out = check_output_dir(args.out_dir, inputs=[src], force=args.force, marker="config.json")
    with atomic_directory(out) as tmp:          # a fresh folder beside OUT_DIR
        (tmp / "config.json").write_text(...)   # renamed to OUT_DIR on success, removed on error

The rules (each is tested in ``tests/test_outputs.py``):

- ``"-"`` is standard output, as are ``/dev/stdout``, ``/dev/fd/1`` and
  ``/proc/self/fd/1`` (written to ``sys.stdout``); ``/dev/stderr``,
  ``/dev/fd/N`` write to that descriptor. Nothing is created or renamed.
- A symbolic link is written *through*: its target gets the content and
  the link stays (a dangling link creates its target, as the shell's ``>``
  does; for folders, a dangling link is refused).
- A character device (``/dev/null``, a terminal) or a FIFO is opened and
  written, never replaced by a file; a block device or a socket is refused.
- An input of the run is never written, whatever the name: the same file
  (device and inode) through a symbolic link or a hard link is refused; a
  folder replaced as a whole must not hold an input either.
- A replaced file keeps its permission bits (and its owner where allowed);
  a new file gets ``0o666`` less the umask. A file without any write
  permission bit, or one the process may not write, is refused.
- A file with more than one hard link is rewritten *in place* (every link
  sees the new content): the content is staged in a temporary file first,
  so a failed run leaves it untouched, but that final copy is not atomic.
- Everything else is atomic: a temporary file in the same folder, flushed,
  ``fsync``-ed, then ``os.replace``-d onto the target; on an error it is
  removed and the old file is untouched.
- Nothing existing is replaced without ``force=True``. (``classify -o``
  passes ``force=True``: a single results file has always been
  overwritten.) A non-empty folder needs ``force``, and with a ``marker``
  only a folder that passes it (one of this command's outputs) is replaced.

Every problem raises :class:`OutputError` (a :class:`ValueError`) with a
one-line message naming the path: ``--output photo.jpg: is an input of this
run (photo.jpg); not writing over it``.
"""

from mlx_evit.outputs.files import OutputSink, OutputTarget, check_output_file
from mlx_evit.outputs.folders import OutputDir, atomic_directory, check_output_dir, write_file
from mlx_evit.outputs.paths import STDOUT, OutputError

__all__ = [
    "STDOUT",
    "OutputError",
    "OutputTarget",
    "OutputSink",
    "OutputDir",
    "check_output_file",
    "check_output_dir",
    "write_file",
    "atomic_directory",
]
