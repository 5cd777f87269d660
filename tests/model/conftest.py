from tests.utils import one_thread  # noqa: F401  (autouse: one torch thread per test)
