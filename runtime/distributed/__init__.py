"""Process groups, the parallel layout and its mesh, expert-parallel dispatch, precision and
compilation."""
