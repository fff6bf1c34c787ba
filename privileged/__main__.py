from privileged.child import main

raise SystemExit(main())
