// PeerJS server, the npm package `peer`, as a user would run it for the comparison.
// Usage: node peerjs_server.mjs PORT
import { PeerServer } from "peer";

const port = Number(process.argv[2]);
// concurrent_limit raised for the connection scenario (default 5000);
// alive_timeout beyond any scenario, as clients here send no heartbeats.
PeerServer({ port, host: "127.0.0.1", path: "/", concurrent_limit: 100000, alive_timeout: 600000 }, () =>
  console.log(`peerjs listening on ${port}`),
);
