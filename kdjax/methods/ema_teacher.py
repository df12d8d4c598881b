"""A teacher that is an exponential moving average of the student."""

METHODS = ()
