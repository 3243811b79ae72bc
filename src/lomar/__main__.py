from lomar.cli.app import run

run()
