import os,sys,zlib
os.write(1,b'MITO000\n')
n=PREAMBLE_LEN;p=[]
while n:
 b=os.read(0,n)
 if not b:sys.exit('mitogen: stdin closed during bootstrap')
 p.append(b);n-=len(b)
m=sys.modules;g=m['mitogen']=type(sys)('mitogen');g.__path__=[];c=g.core=m['mitogen.core']=type(sys)('mitogen.core')
exec(compile(zlib.decompress(b''.join(p)),'<mitogen.core>','exec'),c.__dict__)
c._bootstrap()
