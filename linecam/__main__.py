from linecam.cli import main

main()
