from pez_cli.cli import main

main()
