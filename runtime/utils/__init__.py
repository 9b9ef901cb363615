"""Small shared helpers: atomic files, signals, fault injection, the choice registries."""
