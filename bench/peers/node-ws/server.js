'use strict';
// Reference server for the side-by-side benchmark, built the usual way with the `ws` package:
// `join`, `chat` (direct reply to the sender + one event to every other member of the room) and
// `ping`; no auth (the `token` query parameter is ignored), no storage. Each broadcast is
// serialized once and the same string is sent to every member.
//
// Usage: node server.js [PORT]   (listens on 127.0.0.1, WebSocket path /ws)

const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 9200);

/** room_id -> { members: Set<WebSocket>, seq: number } */
const rooms = new Map();

function error(ws, code, msg, errorCode, message) {
  ws.send(JSON.stringify({
    status: 'error',
    code,
    ref: msg.ref,
    room_id: msg.room_id,
    data: { error_code: errorCode, message },
  }));
}

function handle(ws, joined, msg) {
  switch (msg.code) {
    case 'join': {
      let room = rooms.get(msg.room_id);
      if (!room) {
        room = { members: new Set(), seq: 0 };
        rooms.set(msg.room_id, room);
      }
      room.members.add(ws);
      joined.add(room);
      ws.send(JSON.stringify({
        status: 'success',
        code: 'join_response',
        room_id: msg.room_id,
        ref: msg.ref,
        data: {},
      }));
      break;
    }
    case 'chat': {
      const room = rooms.get(msg.room_id);
      if (!room || !joined.has(room)) {
        error(ws, 'chat_response', msg, 'NOT_JOINED', 'join the room first');
        return;
      }
      room.seq += 1;
      const event = {
        status: 'success',
        code: 'chat_response',
        user_id: msg.user_id,
        room_id: msg.room_id,
        data: { seq: room.seq, message: msg.data && msg.data.message },
      };
      const broadcast = JSON.stringify(event);
      for (const member of room.members) {
        if (member !== ws && member.readyState === 1) {
          member.send(broadcast);
        }
      }
      event.ref = msg.ref;
      ws.send(JSON.stringify(event));
      break;
    }
    case 'ping':
      ws.send(JSON.stringify({
        status: 'success',
        code: 'ping_response',
        ref: msg.ref,
        data: { timestamp: new Date().toISOString() },
      }));
      break;
    default:
      error(ws, `${msg.code}_response`, msg, 'UNKNOWN_CODE', 'unknown code');
  }
}

const server = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});
const wss = new WebSocketServer({ server, path: '/ws', perMessageDeflate: false });

wss.on('connection', (ws) => {
  const joined = new Set();
  ws.on('message', (data, isBinary) => {
    let msg;
    try {
      msg = JSON.parse(isBinary ? data : data.toString());
    } catch {
      ws.send('{"status":"error","code":"error","data":{"error_code":"BAD_REQUEST","message":"not JSON"}}');
      return;
    }
    if (msg === null || typeof msg !== 'object' || typeof msg.code !== 'string') {
      ws.send('{"status":"error","code":"error","data":{"error_code":"BAD_REQUEST","message":"no code"}}');
      return;
    }
    handle(ws, joined, msg);
  });
  ws.on('close', () => {
    for (const room of joined) {
      room.members.delete(ws);
    }
  });
  ws.on('error', () => {});
});

server.listen(port, '127.0.0.1', () => {
  console.error(`node-ws peer listening on 127.0.0.1:${port}`);
});
