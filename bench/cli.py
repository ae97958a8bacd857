"""The bench's command lines share model.cli, which sits below both the bench and the model (the model's CLIs
use it without importing the bench): one-line refusals with exit status 2, the argparse types, the checks of
the machine (devices, backends, writable folders). See model/cli.py."""
from model.cli import (DEVICES, ArgumentParser, backend_problem, check_backend, check_device,  # noqa: F401
                       check_writable, devices_here, existing_file, existing_folder, model_backend_problem,
                       model_backends, nonempty_text, nonnegative_float, nonnegative_int, out_folder,
                       positive_float, positive_int, probability, runnable, seed, token_ids, writable_problem)
