import errno
import functools
import sys


class HarnessError(Exception):
    """A user-facing error: one line naming the bad field, file or value."""


def decode_text(path, raw: bytes, encoding: str = "utf-8", error: type[HarnessError] = HarnessError) -> str:
    """A file's bytes as text; bytes that are not UTF-8 are one line naming the file, line, byte and offset
    (config files and dataset files alike)."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as problem:
        offset = problem.start + len(raw) - len(problem.object)  # utf-8-sig reports offsets after a BOM
        line = raw.count(b"\n", 0, offset) + 1
        raise error(f"{path}: line {line} is not UTF-8 text (byte 0x{raw[offset]:02x} at offset {offset}); "
                    "re-save it as UTF-8") from None


def one_line_errors(command):
    """CLI contract: a HarnessError becomes `error: ...` on stderr and exit code 2 instead of a traceback.

    Ctrl-C (SIGINT) is a clean stop, not a crash: the runs it cut short are already marked KILLED by the
    tracker, so one line says so and rerunning the same command resumes (exit code 130, the shell's).
    A full disk is one line naming the file, never a traceback; so is a CUDA out-of-memory error, which
    names the settings that lower memory (the GPU study of issue 12 hit one in a 1.5B fp32 fine-tune).
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import torch
        import typer

        MemoryError_ = torch.OutOfMemoryError

        try:
            return command(*args, **kwargs)
        except HarnessError as error:
            print(f"error: {error}", file=sys.stderr)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            print("interrupted: unfinished runs are marked KILLED; rerun the same command to resume", file=sys.stderr)
            raise typer.Exit(code=130) from None
        except MemoryError_ as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
            # A judge served by vLLM (judges[].engine: vllm) holds a fixed share of the GPU in its server process.
            shares = ("; a judge's vLLM server holds HARNESS_VLLM_JUDGE_GPU_MEMORY of the GPU: lower it, or set the "
                      "judge's engine: hf" if "harness.judges.vllm_server" in sys.modules else "")
            print(f"error: GPU out of memory ({first[:160]}); lower eval.batch_size, or for training train.batch_size "
                  "(raising grad_accum keeps the effective batch), or set train.gradient_checkpointing"
                  f"{shares}; rerun to resume", file=sys.stderr)
            raise typer.Exit(code=2) from None
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            print(f"error: disk full writing {error.filename or 'a file'}; free space and rerun to resume", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return wrapper
