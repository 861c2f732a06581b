"""A real server process whose decode programs fail after dispatch from their Nth call on, like a
device fault (tests/serving/test_failures.py): python -m tests.serving.faulty_server CONFIG N."""

import sys


def main(config_path: str, fail_from: int) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from meshserve.runtime.engine import EngineConfig
    from meshserve.serving.cli import run_server
    from meshserve.serving.config import ServerConfig
    from meshserve.serving.server import Server, build_engine

    config = ServerConfig.from_yaml(config_path)
    build = build_engine(config, EngineConfig.from_yaml(config_path), progress=False)
    calls = [0]

    def faulty_build():
        engine = build()
        for shape, program in list(engine.programs.compiled.items()):
            if shape[0] == "decode":
                def faulty(*args, _run=program):
                    result = _run(*args)  # dispatched: the pool is donated
                    calls[0] += 1
                    if calls[0] >= fail_from:
                        raise RuntimeError("injected device fault")
                    return result
                engine.programs.compiled[shape] = faulty
        return engine

    run_server(Server(config, faulty_build))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
