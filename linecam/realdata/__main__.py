from linecam.realdata.build import main

main()
