from kodalle_cli.cli import main

main()
